"""pytest plugin for runs on shared GPU machines whose cards must not be changed:
every NVML setter raises, so a test that would write a real card fails instead.
Use: PYTHONPATH=tests/device python -m pytest -p no_card_writes ..."""
import pynvml


def _blocked(name):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"{name} is blocked on this machine: its cards must not be changed")

    return refuse


for _name in dir(pynvml):
    if _name.startswith("nvmlDeviceSet") or _name in ("nvmlDeviceResetGpuLockedClocks", "nvmlDeviceResetApplicationsClocks"):
        setattr(pynvml, _name, _blocked(_name))
