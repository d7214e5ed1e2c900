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

from peft import PeftModel, mapping

from .config import PEFT_TYPE, FunLoRAConfig
from .functions import FUNCTIONS, FunctionFamily, get_function
from .layer import FunLoRALayer
from .model import FunLoRAModel, _guard_from_pretrained, _guard_load_adapter, check_adapter_state_dict


def register_funlora() -> None:
    """Register FunLoRA with PEFT; idempotent (importing `funlora_peft` calls it).

    Also makes `PeftModel.load_adapter` (and so `PeftModel.from_pretrained`) all or nothing for FunLoRA models:
    `funlora_peft.tuner.model._guard_load_adapter` explains why; other tuners' calls go straight through.
    """
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = FunLoRAConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = FunLoRAModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = FunLoRAModel.prefix
    if not getattr(PeftModel.load_adapter, "_funlora_guard", False):
        PeftModel.load_adapter = _guard_load_adapter(PeftModel.load_adapter)
    if not getattr(PeftModel.from_pretrained, "_funlora_guard", False):
        PeftModel.from_pretrained = _guard_from_pretrained(PeftModel.from_pretrained)


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
