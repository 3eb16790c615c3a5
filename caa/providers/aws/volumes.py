"""EBS volumes of the pod's CSI block volumes (spec-providers §3.3): checked before RunInstances, attached once
the instance runs (device `/dev/xvdb`..., in the adaptor's order), detached (never deleted) before it goes.

Every step asks EC2 what is attached rather than remembering it, so a restarted adaptor detaches the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from xml.etree import ElementTree

from attrs import frozen

__all__ = ["VOLUME_ID", "Attachment", "VolumeState", "device_name", "is_data_device", "parse_volumes",
           "prevalidation_problems"]

#: upstream's pre-check of a CSI disk id
VOLUME_ID = re.compile(r"vol-[0-9a-f]{8,}")
#: the device names `device_name` gives (never an AMI's root device, /dev/xvda or /dev/sda1)
_DATA_DEVICE = re.compile(r"/dev/xvd[b-z][a-z]?")


def device_name(index: int) -> str:
    """The device of the index-th data volume: /dev/xvdb ... /dev/xvdz (0-24), then /dev/xvdba, /dev/xvdbb, ..."""
    if index < 0:
        raise ValueError(f"volume index {index} is negative")
    if index < 25:
        return f"/dev/xvd{chr(ord('b') + index)}"
    first, second = divmod(index - 25, 26)
    if first > 24:
        raise ValueError(f"volume index {index}: no EBS device name left")
    return f"/dev/xvd{chr(ord('b') + first)}{chr(ord('a') + second)}"


def is_data_device(device: str) -> bool:
    """True for a device name `device_name` hands out: a data volume attached by us."""
    return bool(_DATA_DEVICE.fullmatch(device))


@frozen
class Attachment:
    instance_id: str
    device: str
    state: str
    delete_on_termination: bool


@frozen
class VolumeState:
    """One item of DescribeVolumes: its id, status (creating, available, in-use, ...) and attachments."""

    volume_id: str
    status: str
    attachments: tuple[Attachment, ...] = ()

    def attachment_to(self, instance_id: str) -> Attachment | None:
        return next((a for a in self.attachments if a.instance_id == instance_id), None)


def parse_volumes(root: ElementTree.Element) -> dict[str, VolumeState]:
    """DescribeVolumes' answer (namespaces stripped) by volume id."""
    out = {}
    for item in root.findall("volumeSet/item"):
        attachments = tuple(
            Attachment(a.findtext("instanceId", ""), a.findtext("device", ""), a.findtext("status", ""),
                       a.findtext("deleteOnTermination", "false") == "true")
            for a in item.findall("attachmentSet/item"))
        volume_id = item.findtext("volumeId", "")
        out[volume_id] = VolumeState(volume_id, item.findtext("status", ""), attachments)
    return out


def prevalidation_problems(volume_ids: Sequence[str], found: dict[str, VolumeState],
                           instance_id: str = "") -> list[str]:
    """Why the volumes cannot be attached (empty: they can): each must exist and be available, or be attached
    to `instance_id` already (a create retried for the same instance)."""
    problems = []
    for volume_id in volume_ids:
        state = found.get(volume_id)
        if state is None:
            problems.append(f"volume {volume_id} not found")
        elif state.status != "available" and not (instance_id and state.attachment_to(instance_id)):
            problems.append(f"volume {volume_id} is {state.status}, not available")
    return problems
