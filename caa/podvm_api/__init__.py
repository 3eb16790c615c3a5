"""The node <-> pod VM contract: every file and annotation the adaptor writes and the pod VM reads.

Both daemons import this package (caa.adaptor on the node, caa.forwarder in the pod VM) and neither imports
the other, so each format has exactly one home and one test of its round trip:

- `apf`: apf.json, the forwarder's configuration (one class, written by the adaptor, read by the forwarder);
- `cloudconfig`: the cloud-config user-data document (writer and strict parser) and its `WriteFile`;
- `initdata`: the initdata document (encode, decode, parse, digest);
- `volumes`: the `cloud_volumes` CreateContainer annotation;
- `naming`: pod VM names (always valid DNS labels);
- `gojson`, `godur`: Go `encoding/json` output and decoding rules, Go durations (upstream is written in Go,
  so what crosses the wire must read and write like Go).

The modules import nothing from caa.adaptor, caa.forwarder or caa.providers; they sit below all three.
Keep this file free of imports: the pod VM's one-shot commands import only the module they need.
"""
