"""A local stand-in for the AI Data Platform MLflow endpoints (tests, benchmarks, demos)."""

from batchlog.emulator.server import Emulator, EmulatorConfig, EmulatorState, EmulatorThread

__all__ = ["Emulator", "EmulatorConfig", "EmulatorState", "EmulatorThread"]
