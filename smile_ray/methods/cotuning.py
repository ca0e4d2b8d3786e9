"""Co-Tuning (You, Kou, Jiang, Wang and Long, NeurIPS 2020).

The student keeps a source head ``h_s`` (initialised from the pre-trained classifier and
trained). Before training, the category relationship ``R`` (``C_target x C_source``,
``R[c] = p(y_s | y_t = c)``) is computed once, in its direct form (TLlib): with the
pre-trained network in eval mode on the un-augmented training images,
``R[c]`` = the mean of ``softmax(h_s(f(x)))`` over the images of class c. Then

    L = CE(g(f(x)), y) + cotuning_weight * mean_b(-sum_k R[y_b, k] * log softmax(h_s(f(x_b)))_k)
        + head_l2_weight * L_head

with lambda = 2.3; ``L_head`` covers both heads.

Deviations: the direct relationship, not the original code's reverse one (a calibrated
logistic regression from source probabilities to target labels, inverted with Bayes'
rule, with a validation split of its own). ``R`` is a one-off preparation, cached and
costed in ``metrics.json`` (``method_info.preparation.cotuning_relationship``). Data
parallel: a per-image mean, so DDP's averaging gives the global batch's mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from smile_ray.losses import cotuning_loss, cotuning_relationship
from smile_ray.methods.base import Method, train_source_logits


class CoTuning(Method):
    uses_source_head = True

    def attach(self, model, source, task=None, cache_dir=None):
        super().attach(model, source, task, cache_dir)
        device = next(model.parameters()).device
        task = self.need_task()
        def relationship():
            probs = torch.softmax(train_source_logits(source, task, device), dim=1)
            return {"relationship": cotuning_relationship(probs, task.train_labels().to(device), task.num_classes)}

        self.relationship = self.prepare("cotuning_relationship", source, {"direct": True}, relationship,
                                         device)["relationship"]

    def loss(self, model, x, y, step):
        c = self.config
        out = model(x)
        parts = {"cls": F.cross_entropy(out.logits, y),
                 "cotuning": cotuning_loss(out.aux_logits, y, self.relationship)}
        return self.add_head_l2(model, parts["cls"] + c.cotuning_weight * parts["cotuning"], parts), parts
