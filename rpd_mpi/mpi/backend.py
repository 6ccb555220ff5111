"""The array module of one rank (docs/DESIGN.md 4.4): numpy on the CPU, cupy on a GPU.

`select(device, local_rank, devices_per_node)` returns a `Backend`: its module `xp`, the
copies between host and device (`to_device`, `to_host`), `synchronize()` and a description
for the ledger. On `cuda` the rank uses device `local_rank % n` (n = `devices_per_node`, or
every visible device when None; 1 puts all ranks of a node on device 0) and makes it the
current device before anything is allocated. The CPU backend's copies return their argument
itself, so the CPU path computes exactly what it did before backends existed.

cupy is imported only inside `select("cuda", ...)`; importing this module imports neither
cupy nor mpi4py. No GPU or no cupy ends in `ConfigError("--device", ...)` saying which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from rpd_mpi.config import ConfigError

NEEDS = "cuda needs cupy and a visible GPU"


@dataclass(frozen=True)
class Backend:
    """Where one rank's arrays live."""

    name: str                        # "cpu" or "cuda"
    xp: ModuleType                   # numpy or cupy
    device_id: int | None = None     # the CUDA device of this rank
    card: str = ""                   # the device's name
    info: dict[str, Any] = field(default_factory=dict)

    def to_device(self, a: Any) -> Any:
        """A device copy of the host array a (CPU: a itself when it is an ndarray)."""
        return self.xp.asarray(a)

    def to_host(self, a: Any) -> np.ndarray:
        """A host (numpy) array of a (CPU: a itself when it is an ndarray)."""
        return np.asarray(a) if self.xp is np else self.xp.asnumpy(a)

    def synchronize(self) -> None:
        """Wait for all work queued on this rank's device (CPU: nothing to wait for)."""
        if self.xp is not np:
            self.xp.cuda.Device(self.device_id).synchronize()

    def describe(self) -> dict[str, Any]:
        """What the ledger records about this rank's device."""
        return {"device": self.name, "device_id": self.device_id, "card": self.card,
                **self.info}


CPU = Backend("cpu", np)


def _import_cupy() -> ModuleType:
    try:
        import cupy  # noqa: PLC0415  (optional dependency, only for --device cuda)
    except ImportError as err:
        raise ConfigError("--device", f"{NEEDS} (cannot import cupy: {err}; install the "
                                      f"cupy wheel for your CUDA, e.g. cupy-cuda12x)") from None
    module: ModuleType = cupy
    return module


def _device_count(cupy: ModuleType) -> int:
    try:
        available = bool(cupy.cuda.is_available())
        count = int(cupy.cuda.runtime.getDeviceCount()) if available else 0
    except Exception as err:   # noqa: BLE001  (a CUDA driver error of any kind)
        raise ConfigError("--device", f"{NEEDS} (CUDA: {err})") from None
    if count < 1:
        raise ConfigError("--device", f"{NEEDS} (cupy {cupy.__version__} sees no GPU: "
                                      f"cupy.cuda.is_available() is False; check the driver "
                                      f"and CUDA_VISIBLE_DEVICES)")
    return count


def device_for(local_rank: int, visible: int, devices_per_node: int | None) -> int:
    """The device of a rank: local_rank mod the devices used on its node."""
    if local_rank < 0:
        raise ValueError(f"local_rank must be >= 0, got {local_rank}")
    used = visible if devices_per_node is None else devices_per_node
    if not 1 <= used <= visible:
        raise ConfigError("--gpus-per-node", f"asks for {used} devices per node but this "
                                             f"node shows {visible}")
    return local_rank % used


def _card_name(cupy: ModuleType, device_id: int) -> str:
    name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def select(device: str, local_rank: int = 0, devices_per_node: int | None = None) -> Backend:
    """The backend of a rank that is `local_rank` among the ranks of its node."""
    if device == "cpu":
        return CPU
    if device != "cuda":
        raise ConfigError("--device", f"must be one of cpu, cuda (got {device!r})")
    cupy = _import_cupy()
    visible = _device_count(cupy)
    dev = device_for(local_rank, visible, devices_per_node)
    try:
        cupy.cuda.Device(dev).use()
        card = _card_name(cupy, dev)
    except Exception as err:   # noqa: BLE001  (a CUDA error: every rank must hear of it)
        raise ConfigError("--device", f"{NEEDS} (device {dev}: {err})") from None
    return Backend("cuda", cupy, dev, card,
                   {"local_rank": local_rank, "visible_devices": visible,
                    "cupy": str(cupy.__version__)})
