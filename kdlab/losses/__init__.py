"""Pure distillation loss primitives: ``fn(student, teacher, *, hparams, where=None)``."""

from kdlab.losses.attention import at, attention_kl, value_relation
from kdlab.losses.contrastive import CRDState, crd, crd_init_state, info_nce
from kdlab.losses.ensembles import combine_teachers
from kdlab.losses.features import ab, cc, fitnet, fsp, ft, nst, pkt, rkd_angle, rkd_distance, sp, vid
from kdlab.losses.logits import ce, dkd, hard_ce, jsd, kd, logit_l2, reverse_kl, top_k_agreement, tvd

__all__ = [
    "CRDState", "ab", "at", "attention_kl", "cc", "ce", "combine_teachers", "crd", "crd_init_state",
    "dkd", "fitnet", "fsp", "ft", "hard_ce", "info_nce", "jsd", "kd", "logit_l2", "nst", "pkt",
    "reverse_kl", "rkd_angle", "rkd_distance", "sp", "top_k_agreement", "tvd", "value_relation",
    "vid",
]
