"""mixprec: safe, automatic and measured mixed-precision training for PyTorch."""

__version__ = "0.1.0"

from mixprec.engine import Engine, StepResult
from mixprec.errors import UsageError
from mixprec.policy import ControllerConfig, Policy, Rule, ScalerConfig, parse_policy, policy_from_options
from mixprec.quantization import quantize, sqnr_db
from mixprec.runs.train import train
from mixprec.runs.verify import verify
from mixprec.sensitivity_analysis import sensitivity
from mixprec.scaler import LossScaler
from mixprec.task import Task

__all__ = [
    "ControllerConfig", "Engine", "LossScaler", "Policy", "Rule", "ScalerConfig", "StepResult",
    "Task", "UsageError", "__version__", "parse_policy", "policy_from_options", "quantize", "sensitivity", "sqnr_db", "train", "verify",
]
