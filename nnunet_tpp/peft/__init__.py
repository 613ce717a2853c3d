"""One PEFT interface for every model in nnunet_tpp: a registry of methods and the functions that apply,
count, save, load and merge them."""
from nnunet_tpp.peft import (adapter, adaptformer, apla, basic, conv_adapter, dtl, evp, lora, partial,  # noqa: F401
                             ssf, vpt)  # (importing registers the methods)
from nnunet_tpp.peft.api import (PeftConfig, TrainableSummary, apply, architecture_name, atomic_torch_save,
                                 current_names, freeze, identity, is_head, load,
                                 load_state_dict, merge, save, state_dict, target_parameters,
                                 trainable_summary, trained_parameter_names, unwrap)
from nnunet_tpp.peft.fingerprint import backbone_fingerprint, check_identity, fingerprint_backbone
from nnunet_tpp.peft.registry import PeftError, PeftMethod, get_method, methods, register

__all__ = ["backbone_fingerprint", "check_identity", "fingerprint_backbone", "PeftConfig", "PeftError", "PeftMethod", "TrainableSummary", "apply", "architecture_name", "atomic_torch_save", "current_names", "freeze", "identity",
           "get_method", "is_head", "load", "load_state_dict", "merge", "methods", "register", "save",
           "state_dict", "target_parameters", "trainable_summary", "trained_parameter_names", "unwrap"]
