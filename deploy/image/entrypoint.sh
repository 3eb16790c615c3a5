#!/bin/bash
# Command of the caa image (deploy/base): runs one of the three daemons under twistd in the foreground.
#
#   entrypoint.sh caa-adaptor [adaptor flags]        the node DaemonSet; provider from CLOUD_PROVIDER
#   entrypoint.sh <provider> [adaptor flags]         the same, provider named first (upstream's form)
#   entrypoint.sh caa-peerpod-ctrl [flags]           the controller Deployment
#   entrypoint.sh caa-webhook [flags]                the webhook Deployment
#
# Before the adaptor starts, the settings its provider cannot run without are checked with upstream's
# messages (spec-providers §14.3), so a half-configured peer-pods-cm / peer-pods-secret is one clear line in
# the pod's log instead of a provider error later. Everything else (defaults, the other keys) the adaptor
# reads from the environment itself. An unknown provider prints the usage and exits 1 (upstream exits 0,
# which hides the mistake behind a restart loop).
set -euo pipefail

PROVIDERS="aws|azure|gcp|ibmcloud|ibmcloud-powervs|alibabacloud|byom|libvirt|local"
missing=0

usage() {
    cat >&2 <<EOF
Usage:
	CLOUD_PROVIDER=${PROVIDERS} $0 [caa-adaptor] [flags]
or
	$0 ${PROVIDERS} [flags]
or
	$0 caa-peerpod-ctrl|caa-webhook [flags]

in addition all cloud provider specific env variables must be set and valid
(CLOUD_PROVIDER is currently set to "${CLOUD_PROVIDER:-}")
EOF
}

# Every named variable must be set and non-empty.
test_vars() {
    local name
    for name in "$@"; do
        if [ -z "${!name:-}" ]; then
            echo "\$${name} is NOT set" >&2
            missing=1
        fi
    done
    [ "$missing" = 0 ] || exit 1
}

# At least one of the named variables must be set and non-empty.
one_of() {
    local name found=0
    for name in "$@"; do
        if [ -n "${!name:-}" ]; then
            echo "\$${name} is SET"
            found=1
        fi
    done
    if [ "$found" = 0 ]; then
        echo "At least one of these must be SET: $*" >&2
        exit 1
    fi
}

check_provider() {
    case "$1" in
    aws)
        one_of AWS_SECRET_ACCESS_KEY AWS_ROLE_ARN
        if [ -n "${AWS_ROLE_ARN:-}" ]; then
            test_vars AWS_WEB_IDENTITY_TOKEN_FILE
        else
            test_vars AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
        fi
        ;;
    azure)
        test_vars AZURE_CLIENT_ID AZURE_TENANT_ID AZURE_SUBSCRIPTION_ID AZURE_RESOURCE_GROUP AZURE_SUBNET_ID \
            AZURE_IMAGE_ID
        ;;
    gcp)
        test_vars GCP_CREDENTIALS GCP_PROJECT_ID GCP_ZONE PODVM_IMAGE_NAME
        # Google's client libraries look for a key file; the JSON itself stays out of the command line.
        local creds="${TMPDIR:-/tmp}/gcp-creds.json"
        (umask 077 && printf '%s' "$GCP_CREDENTIALS" >"$creds")
        export GOOGLE_APPLICATION_CREDENTIALS="$creds"
        ;;
    ibmcloud)
        one_of IBMCLOUD_API_KEY IBMCLOUD_IAM_PROFILE_ID
        ;;
    ibmcloud-powervs)
        test_vars IBMCLOUD_API_KEY
        ;;
    alibabacloud)
        one_of ALIBABACLOUD_ACCESS_KEY_ID ALIBABA_CLOUD_ROLE_ARN
        ;;
    libvirt)
        test_vars LIBVIRT_URI
        ;;
    byom)
        test_vars VM_POOL_IPS
        ;;
    local) ;;
    *)
        usage
        exit 1
        ;;
    esac
}

daemon() {
    exec twistd --nodaemon --pidfile= "$@"
}

case "${1:-}" in
caa-peerpod-ctrl | caa-webhook)
    daemon "$@"
    ;;
caa-adaptor)
    shift
    provider="${CLOUD_PROVIDER:-}"
    ;;
"" | -*)
    provider="${CLOUD_PROVIDER:-}"
    ;;
*)
    provider="$1"
    shift
    ;;
esac

# One canonical name for Power Virtual Server: the Helm chart wrote ibmcloudpowervs, users write both.
case "$provider" in
ibmcloud_powervs | ibmcloudpowervs) provider=ibmcloud-powervs ;;
esac

check_provider "$provider"
# Upstream's alias: INSTANCE_TYPE names Alibaba Cloud's default instance type (a flag, so it beats
# PODVM_INSTANCE_TYPE; flags given to the container still come later and win).
if [ "$provider" = alibabacloud ] && [ -n "${INSTANCE_TYPE:-}" ]; then
    set -- --instance-type "$INSTANCE_TYPE" "$@"
fi
export CLOUD_PROVIDER="$provider"
daemon caa-adaptor --provider "$provider" "$@"
