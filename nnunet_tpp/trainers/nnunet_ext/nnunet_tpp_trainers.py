"""The module nnU-Net imports when it searches ``nnUNet_extTrainer`` for a trainer name.

nnU-Net imports every module of that folder under its bare name and forgets it afterwards, so this file
only re-exports the classes of :mod:`nnunet_tpp.trainers.zoo`; the classes themselves live (once) there.
"""
from nnunet_tpp.trainers.zoo import *  # noqa: F401,F403
from nnunet_tpp.trainers.zoo import TRAINERS

__all__ = sorted(TRAINERS)
