"""The simulated plant's ground truth: which physical devices exist, who owns them, which protocols
expose them, and which of them send fresh data.

The simulator plays the outside world, so it imports nothing from the project. Every protocol server in
``simulator/`` is built from the same :class:`PlantSpec`, and tests compare what the verifier counted with
:meth:`PlantSpec.ground_truth`.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field

# GB 32100-2015 unified social credit code: 31-character alphabet, weights 3^i mod 31.
_USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)

MANUFACTURERS = (
    ("Zhejiang Zhongkong", "ECS-700"),
    ("Jiaxing Precision Motors", "JPM-S3"),
    ("Hangzhou Hollysys", "LK-220"),
    ("Siemens", "S7-1500"),
    ("Delta Electronics", "DVP-ES2"),
)

PROTOCOLS = ("opcua", "modbus", "mqtt")


def uscc(rng: random.Random, region: str = "330400") -> str:
    """A well-formed unified social credit code (registration authority 9, enterprise 1, Jiaxing region)."""
    body = "91" + region + "".join(rng.choice(_USCC_ALPHABET[:10] + "ABCDEFGH") for _ in range(9))
    total = sum(_USCC_ALPHABET.index(c) * w for c, w in zip(body, _USCC_WEIGHTS, strict=True))
    check = (31 - total % 31) % 31
    return body + _USCC_ALPHABET[check]


@dataclass(frozen=True)
class SimEnterprise:
    uscc: str
    name: str


@dataclass(frozen=True)
class SimDevice:
    """One physical device of the plant."""

    index: int
    enterprise: str  # USCC of the owner
    manufacturer: str
    model: str
    serial: str
    protocols: tuple[str, ...]  # through which protocols it is visible ("opcua", "modbus", "mqtt")
    active: bool  # sends fresh data of good quality; False = connected but silent (or FAILURE health)

    @property
    def product_instance_uri(self) -> str:
        return f"urn:{self.manufacturer.replace(' ', '-').lower()}:{self.model.lower()}:{self.serial}"

    @property
    def name(self) -> str:
        return f"dev{self.index:05d}"


@dataclass(frozen=True)
class PlantSpec:
    enterprises: tuple[SimEnterprise, ...]
    devices: tuple[SimDevice, ...]
    seed: int = 0

    def on(self, protocol: str) -> list[SimDevice]:
        return [d for d in self.devices if protocol in d.protocols]

    def ground_truth(self) -> dict[str, object]:
        """What a correct, de-duplicating counter must find."""
        active = [d for d in self.devices if d.active]
        return {
            "devices": len(self.devices),
            "active_devices": len(active),
            "active_enterprises": len({d.enterprise for d in active}),
            "per_protocol": {p: len(self.on(p)) for p in PROTOCOLS},
            "per_protocol_active": {p: sum(1 for d in self.on(p) if d.active) for p in PROTOCOLS},
            "multi_protocol_devices": sum(1 for d in self.devices if len(d.protocols) > 1),
        }

    def to_json(self) -> str:
        return json.dumps({"seed": self.seed, "enterprises": [asdict(e) for e in self.enterprises],
                           "devices": [asdict(d) for d in self.devices]}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> PlantSpec:
        raw = json.loads(text)
        return cls(
            enterprises=tuple(SimEnterprise(**e) for e in raw["enterprises"]),
            devices=tuple(SimDevice(**{**d, "protocols": tuple(d["protocols"])}) for d in raw["devices"]),
            seed=raw["seed"],
        )


@dataclass(frozen=True)
class PlantShape:
    """How many devices each protocol exposes, how many are shared, how many are silent."""

    opcua: int = 20
    modbus: int = 10
    mqtt: int = 15
    opcua_and_mqtt: int = 4  # devices visible through both OPC UA and MQTT (counted once)
    modbus_and_opcua: int = 3  # devices visible through both Modbus and OPC UA (counted once)
    silent: int = 3  # connected but sending no fresh data: never active
    enterprises: int = 4
    extra: dict[str, int] = field(default_factory=dict)


def make_plant(shape: PlantShape | None = None, *, seed: int = 7) -> PlantSpec:
    """A reproducible plant. Devices are spread over enterprises round-robin; shared devices come first."""
    shape = shape or PlantShape()
    rng = random.Random(seed)
    enterprises = tuple(SimEnterprise(uscc(rng), f"嘉兴示范企业{i + 1:03d}") for i in range(shape.enterprises))
    plan: list[tuple[str, ...]] = []
    plan += [("opcua", "mqtt")] * shape.opcua_and_mqtt
    plan += [("opcua", "modbus")] * shape.modbus_and_opcua
    plan += [("opcua",)] * max(0, shape.opcua - shape.opcua_and_mqtt - shape.modbus_and_opcua)
    plan += [("modbus",)] * max(0, shape.modbus - shape.modbus_and_opcua)
    plan += [("mqtt",)] * max(0, shape.mqtt - shape.opcua_and_mqtt)
    # Silent devices: spread over the single-protocol ones at the end of each protocol's list.
    silent_idx: set[int] = set()
    singles = [i for i, p in enumerate(plan) if len(p) == 1]
    for k in range(min(shape.silent, len(singles))):
        silent_idx.add(singles[(k * 7919) % len(singles)])
    devices = []
    for i, protos in enumerate(plan):
        manufacturer, model = MANUFACTURERS[i % len(MANUFACTURERS)]
        devices.append(
            SimDevice(
                index=i,
                enterprise=enterprises[i % len(enterprises)].uscc,
                manufacturer=manufacturer,
                model=model,
                serial=f"SN{seed:02d}{i:06d}{rng.randrange(16**4):04X}",
                protocols=protos,
                active=i not in silent_idx,
            )
        )
    return PlantSpec(enterprises=enterprises, devices=tuple(devices), seed=seed)
