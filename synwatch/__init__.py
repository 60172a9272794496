"""synwatch: SYN-flood and listen-queue-overflow watcher built on the kernel's own state."""

__version__ = "0.1.0"
__all__ = ["__version__"]
