"""nnU-Net v2 trainers of nnunet_tpp. nnU-Net finds them through ``nnunet_ext/`` (see ``nnunet_tpp._startup``)."""
import os

EXT_TRAINER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_ext")
