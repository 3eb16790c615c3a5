"""
Azure AD (Microsoft identity platform) tokens for ARM, requested on treq through `caa.providers.rest` instead of
the azure-identity SDK: its credentials are blocking (requests/msal) and would need a thread per refresh, while
the three flows the adaptor needs are single documented OAuth2 requests. The choice, as azure-identity's
EnvironmentCredential / WorkloadIdentityCredential / ManagedIdentityCredential make it:

1. **Client secret** (--secret, AZURE_CLIENT_SECRET): `POST {authority}/{tenant}/oauth2/v2.0/token` with
   `grant_type=client_credentials`, `client_id`, `client_secret`, `scope=https://management.azure.com/.default`.
2. **Workload identity** (AZURE_FEDERATED_TOKEN_FILE, projected by the AKS webhook): the same request with
   `client_assertion` = the file's current text (re-read at every refresh: kubelet rotates it, in a worker
   thread) and `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`.
3. **Managed identity** (neither): the node's IMDS, `GET /metadata/identity/oauth2/token?api-version=2018-02-01
   &resource=https://management.azure.com/` (+ `client_id` of a user-assigned identity) with `Metadata: true`.
"""

from __future__ import annotations

from urllib.parse import urlencode

from twisted.internet.threads import deferToThreadPool

from caa.providers.azure.config import AzureConfig
from caa.providers.interfaces import InvalidConfig
from caa.providers.rest import RestClient, RestRequest
from caa.providers.token import token_error, token_response
from caa.reactors import INodeReactor

ARM_RESOURCE = "https://management.azure.com/"
ARM_SCOPE = ARM_RESOURCE + ".default"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
IMDS_API_VERSION = "2018-02-01"


def credential_kind(config: AzureConfig) -> str:
    """"client-secret", "workload-identity" or "managed-identity" (what `fetch_token` will use)."""
    if config.client_secret:
        return "client-secret"
    if config.federated_token_file:
        return "workload-identity"
    return "managed-identity"


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


async def fetch_token(reactor: INodeReactor, rest: RestClient, config: AzureConfig) -> tuple[str, float]:
    """A fresh ARM access token and its lifetime, by the flow `credential_kind` names."""
    kind = credential_kind(config)
    form = {"grant_type": "client_credentials", "client_id": config.client_id, "scope": ARM_SCOPE}
    if kind == "managed-identity":
        query = {"api-version": IMDS_API_VERSION, "resource": ARM_RESOURCE}
        if config.client_id:
            query["client_id"] = config.client_id
        request = RestRequest("GET", f"{config.imds_endpoint}/metadata/identity/oauth2/token?{urlencode(query)}",
                              {"Metadata": "true"})
        what = "azure managed identity token"
    else:
        if kind == "client-secret":
            form["client_secret"] = config.client_secret
        else:
            try:
                assertion = await deferToThreadPool(reactor, reactor.getThreadPool(), _read,
                                                    config.federated_token_file)
            except OSError as e:
                raise InvalidConfig(f"azure: reading AZURE_FEDERATED_TOKEN_FILE: {e.strerror}: "
                                    f"{config.federated_token_file}") from None
            rest.redactor.add(assertion)
            form.update(client_assertion=assertion, client_assertion_type=JWT_BEARER)
        request = RestRequest("POST", f"{config.authority_host}/{config.tenant_id}/oauth2/v2.0/token",
                              {"Content-Type": "application/x-www-form-urlencoded"}, urlencode(form).encode())
        what = f"azure {kind} token"
    response = await rest.call(request, error_of=token_error, what=what)
    return token_response(response, what)
