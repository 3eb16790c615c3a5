"""
AWS provider (spec-providers §3): one EC2 instance per pod VM, created through the EC2 Query API on treq
(`ec2.py`, signed with botocore's SigV4 and credential chain), the user data in `UserData` (base64).

Options (default < env < flag), upstream's names:

    --aws-access-key-id  AWS_ACCESS_KEY_ID          "" (secret)
    --aws-secret-key     AWS_SECRET_ACCESS_KEY      "" (secret)
    --aws-session-token  AWS_SESSION_TOKEN          "" (secret)
    --aws-region         AWS_REGION                 "" (else the profile's region)
    --aws-profile        (none)                     ""
    --instance-type      PODVM_INSTANCE_TYPE        m6a.large
    --instance-types     PODVM_INSTANCE_TYPES       "" (allowed list, comma-separated)
    --aws-lt-name        PODVM_LAUNCHTEMPLATE_NAME  kata
    --use-lt             USE_PODVM_LAUNCHTEMPLATE   false
    --imageid            PODVM_AMI_ID               "" (required unless --use-lt)
    --keyname            SSH_KP_NAME                ""
    --subnetid           AWS_SUBNET_ID              ""
    --securitygroupids   AWS_SG_IDS                 ""
    --use-public-ip      USE_PUBLIC_IP              false
    --root-volume-size   ROOT_VOLUME_SIZE           30 (GiB; 0 = the AMI's)
    --disable-cvm        DISABLECVM                 false
    --tags               TAGS                       "" (k=v,k2=v2)
The endpoint is https://ec2.<region>.amazonaws.com unless AWS_ENDPOINT_URL_EC2 or AWS_ENDPOINT_URL is set. A
subnet, security groups, region or key pair left unset come from the node's instance metadata (imds.py) unless
AWS_EC2_METADATA_DISABLED=true. docs/providers.md has the IAM policy and an example.
"""

from __future__ import annotations

from twisted.python import usage
from zope.interface import implementer

from caa.providers.aws.config import AwsConfig, AwsOptions
from caa.providers.interfaces import IProvider, IProviderFactory
from caa.reactors import INodeReactor


@implementer(IProviderFactory)
class AwsProviderFactory:
    name = "aws"
    description = "Pod VMs as Amazon EC2 instances (AMD SEV-SNP unless --disable-cvm)"

    def options(self) -> usage.Options:
        return AwsOptions()

    def create(self, reactor: INodeReactor, options: usage.Options) -> IProvider:
        from caa.providers.aws.provider import AwsProvider

        return AwsProvider(reactor, AwsConfig.from_options(options))


__all__ = ["AwsProviderFactory", "AwsOptions", "AwsConfig"]
