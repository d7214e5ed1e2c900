"""funlora-peft: FunLoRA (functional rank-1 adapters) for continual class-conditional generation.

Importing the package registers FunLoRA with PEFT under the peft type "FUNLORA", so that `get_peft_model`,
`PeftModel.from_pretrained`, `PeftConfig.from_pretrained`, `save_pretrained` and `load_adapter` work with it.
"""

from .hub import download_index, download_run, push_to_hub
from .model_card import write_model_card
from .pipeline import FunLoRAPipeline
from .tuner import (
    FUNCTIONS,
    PEFT_TYPE,
    FunLoRAConfig,
    FunLoRALayer,
    FunLoRAModel,
    check_adapter_state_dict,
    get_function,
    register_funlora,
)

__version__ = "0.1.0"

__all__ = [
    "FUNCTIONS",
    "PEFT_TYPE",
    "FunLoRAConfig",
    "FunLoRALayer",
    "FunLoRAModel",
    "FunLoRAPipeline",
    "check_adapter_state_dict",
    "download_index",
    "download_run",
    "get_function",
    "push_to_hub",
    "register_funlora",
    "write_model_card",
]
