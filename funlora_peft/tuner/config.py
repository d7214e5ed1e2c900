"""Configuration of a FunLoRA adapter: one adapter per task, holding the classes of that task."""

from __future__ import annotations

import json
import math
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
from peft.config import PeftConfig
from peft.utils import CONFIG_NAME

from .functions import FUNCTIONS, get_function


class _PeftTypeName(str):
    """The peft type "FUNLORA": a plain string for PEFT's mappings and JSON, shown like PEFT's `PeftType` members.

    `PeftType` is a closed enum (see `funlora_peft.tuner`); PEFT's own reports (e.g. `get_model_status`) print a
    member as `PeftType.<NAME>` and read the name after the dot.
    """

    def __str__(self) -> str:
        return f"PeftType.{str.__str__(self)}"

    @property
    def value(self) -> str:
        return str.__str__(self)


PEFT_TYPE = _PeftTypeName("FUNLORA")

# A class id is an int64 label; `init_seed` is spread over the layers (`layer_seed`) within torch's 64-bit seeds.
MAX_CLASS_ID = 2**63 - 1
_SEED_STRIDE = 1_000_003
MAX_INIT_SEED = (2**64 - 2**32) // _SEED_STRIDE - 1


def layer_seed(init_seed: int, layer_key: str) -> int:
    """The seed of one conv's initial factors: per layer, so that convs of equal shape do not start alike."""
    return init_seed * _SEED_STRIDE + zlib.crc32(layer_key.encode())


@dataclass
class FunLoRAConfig(PeftConfig):
    """Configuration of a FunLoRA adapter (one per task).

    Every adapted `nn.Conv2d` with frozen weight `W0` of shape `(out_channels, in_channels, s, s)` gets, for each
    class `y` of `class_ids`, a rank-1 pair `a_y` (out_channels), `b_y` (in_channels), mixing weights `alpha_y` (p)
    and, for `cos`, frequencies `omega_y` (p). They define the functional matrix and the class's weight

        F_y = (1/p) * sum_{i=1..p} alpha_{y,i} * f_i(a_y, b_y)          (out_channels, in_channels)
        W_y = W0 * (1 + F_y)[:, :, None, None]                           (bias unchanged)

    `alpha` starts at 0, so a new adapter is exactly the identity.

    Example:

        ```py
        >>> import funlora_peft
        >>> from funlora_peft import FunLoRAConfig
        >>> from peft import get_peft_model
        >>> config = FunLoRAConfig(class_ids=[0, 1], function="cos", num_functions=10)
        >>> model = get_peft_model(unet, config, adapter_name="task_0")
        >>> velocity = model(x_t, timestep, class_labels=torch.tensor([0, 1, 1, 0])).sample
        ```
    """

    class_ids: list[int] = field(
        default=None,
        metadata={
            "help": "Global class ids this adapter (task) owns; one row of adapter tensors per class. Required; "
            "distinct non-negative integers, disjoint from the class ids of the other adapters of the model."
        },
    )
    function: str = field(
        default="cos",
        metadata={"help": f"Function family f_i raising the rank of F_y: one of {sorted(FUNCTIONS)}."},
    )
    num_functions: int = field(
        default=10,
        metadata={"help": "Number p of functions mixed in F_y (1 for `linear`)."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Names of the nn.Conv2d modules to adapt, as in PEFT: a list of names or name suffixes, or a "
            "regex matched against the full module name. Default: every nn.Conv2d of the model."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Names (list or regex) of modules never to adapt, as in PEFT."},
    )
    init_a_std: float = field(
        default=1.0,
        metadata={"help": "Standard deviation of the normal initialisation of a_y (out_channels)."},
    )
    init_b_std: float = field(
        default=1.0,
        metadata={"help": "Standard deviation of the normal initialisation of b_y (in_channels)."},
    )
    init_omega: float = field(
        default=1.0,
        metadata={"help": "For `cos`: frequencies start at omega_i = init_omega * i, i = 1..p."},
    )
    init_alpha: float = field(
        default=0.0,
        metadata={"help": "Initial value of every alpha_i. 0 (default) makes a new adapter exactly the identity."},
    )
    init_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the adapter's own random initialisation, so that its init does not depend on the global "
            "RNG state. None uses the global RNG."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.class_ids is None:
            raise ValueError(
                "`class_ids` is required: pass the global class ids this adapter (task) owns, e.g. "
                "FunLoRAConfig(class_ids=[0, 1])."
            )
        if isinstance(self.class_ids, int) or not hasattr(self.class_ids, "__iter__"):
            raise TypeError(f"`class_ids` must be a list of ints, got {self.class_ids!r}; e.g. class_ids=[0, 1].")
        class_ids = list(self.class_ids)
        if not class_ids:
            raise ValueError("`class_ids` is empty: an adapter must own at least one class, e.g. class_ids=[0].")
        bad = [
            c
            for c in class_ids
            if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)) or not 0 <= c <= MAX_CLASS_ID
        ]
        if bad:
            raise ValueError(
                f"`class_ids` must hold non-negative ints (int64 labels, at most {MAX_CLASS_ID}), got {bad!r} in "
                f"{class_ids!r}; pass integer class ids."
            )
        duplicates = sorted({c for c in class_ids if class_ids.count(c) > 1})
        if duplicates:
            raise ValueError(
                f"`class_ids` must be distinct, but {duplicates} appear more than once in {class_ids!r}; "
                "list each class once."
            )
        self.class_ids = [int(c) for c in class_ids]

        if not isinstance(self.function, str):
            raise TypeError(f"`function` must be a name, one of {sorted(FUNCTIONS)}, got {self.function!r}.")
        get_function(self.function)  # raises with the list of valid names
        if isinstance(self.num_functions, bool) or not isinstance(self.num_functions, int):
            raise TypeError(f"`num_functions` must be an int, got {self.num_functions!r}.")
        if self.num_functions < 1:
            raise ValueError(f"`num_functions` must be >= 1, got {self.num_functions}; use e.g. num_functions=10.")
        if self.function == "linear" and self.num_functions != 1:
            raise ValueError(
                f"function='linear' is a single rank-1 term, so `num_functions` must be 1, got "
                f"{self.num_functions}; pass num_functions=1 or choose 'cos', 'rshift' or 'power'."
            )
        for name in ("init_a_std", "init_b_std", "init_omega", "init_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(
                    f"`{name}` must be a finite number, got {value!r}: a NaN or infinite initial value makes every "
                    "output NaN."
                )
        for name in ("init_a_std", "init_b_std"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(
                    f"`{name}` must be > 0, got {value}: with a zero factor alpha gets no gradient and the adapter "
                    "never trains."
                )
        if self.init_seed is not None and (isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int)):
            raise TypeError(f"`init_seed` must be an int or None, got {self.init_seed!r}.")
        if self.init_seed is not None and not 0 <= self.init_seed <= MAX_INIT_SEED:
            raise ValueError(
                f"`init_seed` must be between 0 and {MAX_INIT_SEED} (spread over the layers within torch's 64-bit "
                f"seeds), got {self.init_seed}; pass e.g. init_seed=0."
            )
        if self.function == "power" and max(self.init_a_std, self.init_b_std) > 3:
            warnings.warn(
                f"function='power' with init_a_std={self.init_a_std}, init_b_std={self.init_b_std}: the factors pass "
                "through tanh, which saturates for large values and slows training; stds near 1 work best.",
                stacklevel=2,
            )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                value = sorted(value)
                setattr(self, name, value)
            if value is not None and not (
                isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)
            ):
                raise TypeError(
                    f"`{name}` must be None, a regex string or a list of module names, got {value!r}; e.g. "
                    f"{name}=['conv_in', 'down_blocks.0.resnets.0.conv1']."
                )
        if self.task_type is not None:
            raise ValueError(
                f"`task_type` must be None for FunLoRA (it adapts image models, not PEFT's text tasks), got "
                f"{self.task_type!r}."
            )

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs):
        """The JSON object of an `adapter_config.json`; a ValueError naming the file when it is not one."""
        try:
            data = super().from_json_file(path_json_file, **kwargs)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path_json_file} is not valid JSON ({error}); save the adapter again.") from None
        if not isinstance(data, dict):
            kind = type(data).__name__
            raise ValueError(f"{path_json_file} holds {kind}, not a JSON object; save the adapter again.")
        return data

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """PEFT's `from_pretrained`; a config whose fields are refused names its `adapter_config.json`."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (TypeError, ValueError) as error:
            where = "/".join(part for part in (str(pretrained_model_name_or_path), subfolder, CONFIG_NAME) if part)
            if CONFIG_NAME in str(error):
                raise
            raise type(error)(f"{where}: {error}") from None
