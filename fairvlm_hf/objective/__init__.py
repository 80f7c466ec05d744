"""The robust and fair objective in pure torch: contrastive loss, bad-pair mining, group OT."""
