"""LwF: Learning without Forgetting (Li and Hoiem, TPAMI 2017), as a fine-tuning regulariser.

The student keeps a source head ``h_s`` (initialised from the pre-trained classifier).
Before training, the pre-trained network records its source logits ``l_s`` of every
training image once (eval mode, the un-augmented image); then

    L = CE(g(f(x)), y) + lwf_weight * mean_b KL(softmax(l_s[b] / T) || softmax(h_s(f(x_b)) / T))
        + head_l2_weight * L_head

with T = ``lwf_temperature`` (3) and weight 4, no ``T^2`` factor (TLlib). The recorded
logits are looked up by each batch image's index in the training set, so an augmented
view is distilled towards its clean image's logits.

The source head stays frozen, as in TLlib (its driver gives the optimiser the backbone
and the new head only): ``requires_grad`` off, so it is out of the optimiser (no update,
no momentum, no weight decay) and out of ``L_head`` (a constant there); the distillation
term then moves the backbone alone, keeping ``h_s(f(x))`` near the recorded logits
through the features. ``lwf_train_source_head=true`` trains it with the rest (and pays
the head L2 on it), this project's behaviour before issue 35.

Deviations: TLlib records the logits of one augmented view of each image (drawn once);
we record the clean image's. TLlib has no head L2; we keep the shared one on the target
head (``head_l2=false`` removes it). The recording is a one-off preparation, cached and
costed in ``metrics.json`` (``method_info.preparation.lwf_source_logits``). Data
parallel: a per-image mean, so DDP's averaging of equal shards gives the global batch's
mean.
"""
from __future__ import annotations

import torch.nn.functional as F

from smile_ray.losses import lwf_loss
from smile_ray.methods.base import Method, train_source_logits, unwrap


class LwF(Method):
    uses_source_head = True

    def attach(self, model, source, task=None, cache_dir=None):
        super().attach(model, source, task, cache_dir)
        if not self.config.lwf_train_source_head:
            unwrap(model).source_head.requires_grad_(False)
        device = next(model.parameters()).device
        task = self.need_task()
        self.recorded = self.prepare("lwf_source_logits", source, {},
                                     lambda: {"logits": train_source_logits(source, task, device)}, device)["logits"]

    def loss(self, model, x, y, step):
        c = self.config
        out = model(x)
        parts = {"cls": F.cross_entropy(out.logits, y),
                 "lwf": lwf_loss(out.aux_logits, self.recorded[self.batch_indices(step, y)], c.lwf_temperature)}
        return self.add_head_l2(model, parts["cls"] + c.lwf_weight * parts["lwf"], parts), parts
