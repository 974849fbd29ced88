"""Hardware: presets (presets/hardware/*.json, each with its source), hardware JSON files, and
MoAI-style flavors (`8xLarge.4096GB` = 4096 GB / 64 GB = 64 MI250 GCDs = 32 MI250 packages).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

from planner.errors import InvalidRequest, read_json, require_regular_file, unknown_name
from planner.specs import Cluster, Hardware
from planner.validity import MAX_DEVICES_PER_NODE, check_hardware_numbers, check_number

PRESET_DIR = Path(__file__).parent / "presets" / "hardware"

# MoAI flavors count MI250 GCDs of 64 GB each (seeds/moai-llama3-70b-finetuning.md: the flavor list
# and "8xLarge.4096GB" = 32 MI250 GPUs = 64 devices).
FLAVOR_DEVICE = "mi250-gcd-64gb"
FLAVOR_DEVICE_GB = 64
MOAI_FLAVORS = ("Small.64GB", "Medium.128GB", "Large.256GB", "xLarge.512GB", "1.5xLarge.768GB",
                "2xLarge.1024GB", "3xLarge.1536GB", "4xLarge.2048GB", "6xLarge.3072GB", "8xLarge.4096GB",
                "12xLarge.6144GB", "24xLarge.12288GB", "48xLarge.24576GB")


@cache
def presets() -> dict[str, Hardware]:
    found = {}
    for path in sorted(PRESET_DIR.glob("*.json")):
        hardware = Hardware.from_dict(json.loads(path.read_text()))
        found[hardware.name] = hardware
    return found


def load_hardware(ref: str | Hardware) -> Hardware:
    """A preset name or a path to a hardware JSON file (same keys as the presets)."""
    if isinstance(ref, Hardware):
        return ref
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidRequest("--gpu is empty; give a preset name (see `planner hardware`) or a hardware JSON path")
    known = presets()
    if ref.lower() in known:
        return known[ref.lower()]
    path = Path(ref).expanduser()
    require_regular_file(path, "hardware file")  # a FIFO or device: refused, not "does not exist"
    if path.is_file():
        hardware = Hardware.from_dict(read_json(path, "hardware file"))
        _check_hardware(hardware, str(path))
        return hardware
    if ref.endswith(".json") or "/" in ref:
        raise InvalidRequest(f"hardware file {ref!r} does not exist; give an existing JSON file or a preset name")
    raise unknown_name("hardware", ref, known, hint="(see `planner hardware`, or pass a hardware JSON path)")


def chip_of(hardware: Hardware) -> str:
    """The chip whose calibrated efficiencies a part shares: its own `chip`, else its preset's (plans
    and run records written before parts named their chip), else the part itself."""
    if hardware.chip:
        return hardware.chip
    preset = presets().get(hardware.name)
    return preset.chip if preset is not None and preset.chip else hardware.name


def flavor_devices(flavor: str) -> int:
    """Number of MI250 GCDs in a MoAI flavor such as `8xLarge.4096GB` or the short `8xlarge`."""
    text = flavor.strip()
    match = re.fullmatch(r"(?i)(small|medium|large|[\d.]*xlarge)(?:\.(\d+)GB)?", text)
    if not match:
        raise unknown_name("flavor", text, MOAI_FLAVORS, hint="(MoAI flavors are N x 64 GB MI250 GCDs)")
    size, gigabytes = match.group(1).lower(), match.group(2)
    by_size = {f.rsplit(".", 1)[0].lower(): int(f.rsplit(".", 1)[1][:-2]) for f in MOAI_FLAVORS}
    if size not in by_size:
        raise unknown_name("flavor", text, MOAI_FLAVORS)
    expected_gb = by_size[size]
    if gigabytes is not None and int(gigabytes) != expected_gb:
        raise InvalidRequest(f"flavor {text!r}: a {match.group(1)} has {expected_gb} GB; "
                             f"did you mean {match.group(1)}.{expected_gb}GB?")
    return expected_gb // FLAVOR_DEVICE_GB


def make_cluster(hardware: Hardware, num_devices: int, devices_per_node: int | None = None) -> Cluster:
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices <= 0:
        raise InvalidRequest(f"--gpus must be a positive whole number, got {num_devices!r}")
    per_node = hardware.devices_per_node if devices_per_node is None else devices_per_node
    if isinstance(per_node, bool) or not isinstance(per_node, int) or per_node <= 0:
        raise InvalidRequest(f"--gpus-per-node must be a positive whole number, got {per_node!r}")
    check_number(per_node, "--gpus-per-node", MAX_DEVICES_PER_NODE, integer=True)
    per_node = min(per_node, num_devices)
    if num_devices % per_node:
        raise InvalidRequest(f"--gpus {num_devices} is not a whole number of nodes of {per_node}; "
                             f"use a multiple of {per_node} or set --gpus-per-node")
    return Cluster(hardware=hardware, num_devices=num_devices, devices_per_node=per_node)


def _check_hardware(hardware: Hardware, where: str) -> None:
    check_hardware_numbers(hardware, where)  # finite, positive, bounded; a printable name
    if not isinstance(hardware.chip, str):
        raise InvalidRequest(f"{where}: chip must be the silicon's name as text (GH100, GA100, ...), "
                             f"got {hardware.chip!r}")
