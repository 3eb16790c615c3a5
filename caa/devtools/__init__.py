"""Development tools: the demo and the development agent (a stand-in for kata-agent)."""
