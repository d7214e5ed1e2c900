"""The FunLoRA tuner: the PEFT method, laid out as a PEFT tuner folder (`peft/tuners/<method>/`).

`config.py` holds `FunLoRAConfig`, `functions.py` the function families raising the rank of F_y, `layer.py` the
per-conv math and `model.py` the model-level injection and class routing. Importing this package registers FunLoRA
with PEFT.

`PeftType` is a closed enum, so `peft.register_peft_method` refuses a new name. PEFT looks every method up by
`config.peft_type` in three module-level mappings, and a loaded config's `peft_type` is a plain string: writing the
mappings under the string key "FUNLORA" is enough for `get_peft_model`, `PeftModel.from_pretrained`,
`PeftConfig.from_pretrained`, `save_pretrained` and `load_adapter`.
"""

from __future__ import annotations

from peft import mapping

from .config import PEFT_TYPE, FunLoRAConfig
from .functions import FUNCTIONS, FunctionFamily, get_function
from .layer import FunLoRALayer
from .model import FunLoRAModel, check_adapter_state_dict


def register_funlora() -> None:
    """Register FunLoRA with PEFT; idempotent (importing `funlora_peft` calls it)."""
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = FunLoRAConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = FunLoRAModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = FunLoRAModel.prefix


register_funlora()

__all__ = [
    "FUNCTIONS",
    "PEFT_TYPE",
    "FunLoRAConfig",
    "FunLoRALayer",
    "FunLoRAModel",
    "FunctionFamily",
    "check_adapter_state_dict",
    "get_function",
    "register_funlora",
]
