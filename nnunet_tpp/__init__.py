"""nnunet_tpp: parameter-efficient fine-tuning (PEFT) and target parameter pre-training (TPP) for STU-Net in
nnU-Net v2.

Import what you need from the sub-packages (``nnunet_tpp.peft``, ``nnunet_tpp.models``, ...); this module
stays light because it is imported at interpreter start to register the nnU-Net trainers.
"""
__version__ = "0.1.0"
