"""Where the networks run: the ``device`` setting of a profile (``common.device``).

``auto`` takes the first CUDA GPU when torch sees one and the CPU otherwise; ``cpu``, ``cuda`` and
``cuda:N`` ask for that device and fail at once, with the reason, when it is not there (a paper
profile that silently fell back to the CPU would train for months: docs/results.md).

Every stage keeps its data, random generators and checkpoints on the CPU and moves only the
networks and the tensors they compute on. So a checkpoint written on a GPU resumes on the CPU and the
other way round, and the random draws (patch positions, augmentation, SinGAN noise, image pools) are
the same on every device; the arithmetic is not (other kernels round differently), so a run on a GPU
gives other numbers than the same seed on a CPU, as two CPU kernel families already do.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import torch

#: The values ``common.device`` accepts (``cuda:N`` with any index).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")

_CUDA = re.compile(r"cuda(?::(\d+))?")


class DeviceError(ValueError):
    """The requested device does not exist on this machine; the message says why and what to set."""


def parse(spec: str | torch.device | None) -> str:
    """The setting written out (``auto``, ``cpu``, ``cuda`` or ``cuda:N``), whatever this machine has.

    Raises:
        DeviceError: not one of those values.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec is None:
        return "auto"
    setting = spec.strip().lower() if isinstance(spec, str) else None
    if setting not in ("auto", "cpu") and not (setting and _CUDA.fullmatch(setting)):
        raise DeviceError(f"device {spec!r} is not one of {DEVICE_CHOICES}")
    return setting


def resolve(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for a ``device`` setting.

    Args:
        spec: ``auto`` (a CUDA GPU if torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``;
            a ``torch.device`` is checked the same way. None means ``auto``.

    Raises:
        DeviceError: an unknown value, or a GPU that this machine (or this torch build) lacks.
    """
    spec = parse(spec)
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(spec)
    if not torch.cuda.is_available():
        build = f"this torch {torch.__version__} was built without CUDA" if torch.version.cuda is None else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
        raise DeviceError(f"device {spec!r} was asked for, but {build}; set common.device to 'cpu' or 'auto' in the profile (a paper-sized model on a CPU trains for months)")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {spec!r} was asked for, but this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return torch.device(f"cuda:{index}")


def spread(spec: str | torch.device | None = "auto") -> list[torch.device]:
    """The devices that independent models (stages 06-07: structure x fold) are spread over, one
    training process per device: every GPU torch sees for ``auto`` and ``cuda``, the one named for
    ``cuda:N``, else the CPU. On a machine with one GPU or none this is :func:`resolve`'s device.

    Raises:
        DeviceError: as :func:`resolve`.
    """
    one = resolve(spec)
    if parse(spec) in ("auto", "cuda") and one.type == "cuda":
        return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return [one]


def prepare(device: torch.device) -> torch.device:
    """Settings that make a GPU run repeatable: cuDNN picks deterministic algorithms and does not
    benchmark others (whose choice depends on timing). A no-op on the CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return device


def use(spec: str | torch.device | None = "auto") -> torch.device:
    """:func:`resolve` then :func:`prepare`: what a stage calls with its ``device`` setting."""
    return prepare(resolve(spec))


def describe(device: torch.device | str) -> dict:
    """What a run manifest records about the device: its name and, for a GPU, model, memory and the
    CUDA and cuDNN versions torch uses."""
    device = torch.device(device)
    info: dict = {"device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()})
    return info


#: The values ``common.cpu_kernels`` accepts: ``native`` (torch picks the widest kernels this CPU
#: has) or ``avx2`` (ATen's and oneDNN's AVX2 kernels on every x86-64 CPU that has them).
CPU_KERNEL_CHOICES = ("native", "avx2")
#: The variables torch reads, once per process, to cap its CPU kernels.
CPU_KERNEL_VARIABLES = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def cpu_has_avx2(machine: str | None = None, cpuinfo: Path | str = "/proc/cpuinfo") -> bool:
    """Whether this CPU is an x86-64 whose ``/proc/cpuinfo`` lists AVX2 (False where it cannot tell:
    forcing kernels the CPU lacks would end the process with an illegal instruction)."""
    import platform

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return False
    path = Path(cpuinfo)
    if not path.is_file():
        return False
    return any(line.startswith("flags") and "avx2" in line.split() for line in path.read_text().splitlines())


def cpu_kernel_environment(choice: str, *, has_avx2: bool | None = None) -> tuple[dict[str, str], str]:
    """The environment variables that give ``choice``'s CPU kernels, and a note for the reader
    (empty when nothing needs saying).

    Why: another kernel width rounds differently, and a GAN turns rounding into another training
    path, so the same seed gives other numbers on an AVX-512 CPU than on an AVX2 one
    (docs/experiments.md). With ``avx2`` every x86-64 CPU with AVX2 runs the same kernels. On
    other CPUs (ARM, x86 without AVX2) nothing is set and the note says the numbers will differ.

    Raises:
        ValueError: ``choice`` is not one of :data:`CPU_KERNEL_CHOICES`.
    """
    if choice not in CPU_KERNEL_CHOICES:
        raise ValueError(f"cpu_kernels must be one of {CPU_KERNEL_CHOICES}, not {choice!r}")
    if choice == "native":
        return {}, ""
    if not (cpu_has_avx2() if has_avx2 is None else has_avx2):
        return {}, f"cpu_kernels: {choice} ignored: this CPU has no AVX2 kernels, so its numbers differ from an AVX2 machine's"
    return dict(CPU_KERNEL_VARIABLES[choice]), ""


@contextlib.contextmanager
def pinned_cpu_kernels(choice: str) -> Iterator[dict[str, str]]:
    """Within the block, ``os.environ`` holds :func:`cpu_kernel_environment`'s variables, so the
    processes started there (papermill's kernel, and the training workers it spawns) run ``choice``'s
    kernels; the variables are restored afterwards. Yields what was set (nothing on a CPU without
    AVX2: :func:`cpu_kernel_environment` says why). Torch reads them once per
    process, at its first CPU kernel: the calling process keeps the kernels it already has."""
    import os

    env, _ = cpu_kernel_environment(choice)
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def die_with_parent(poll_s: float = 1.0, parent: int | None = None) -> None:
    """End this process as soon as the process that started it ends, however that one ends.

    The training workers of stages 06-07 (spawned by the notebook's kernel, which Jupyter's own parent
    poller ends when ``crossmoda run`` ends) call this first: a killed run then leaves no worker
    training on and writing checkpoints into the output folder under a rerun. On Linux the kernel
    delivers SIGKILL at the parent's death (``PR_SET_PDEATHSIG``); everywhere a watcher thread also
    checks every ``poll_s`` seconds that the parent is still the one that started this process.
    ``parent``: that process's pid (default: the multiprocessing parent, else the current parent).
    """
    import os
    import signal
    import sys
    import threading
    import time

    if parent is None:  # a multiprocessing child knows its parent even if that one is already gone
        import multiprocessing

        known = multiprocessing.parent_process()
        parent = known.pid if known is not None and known.pid else os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if parent == 1 or os.getppid() != parent:  # the parent died before this process got here
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
