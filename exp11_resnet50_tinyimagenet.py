"""Exp 11 - ResNet-50 on Tiny-ImageNet (200 classes, 64x64), baseline vs SES every step.

Paper question: does SES still help a deeper Bottleneck network on a harder task? SES hooks
layer4.0, layer4.1, layer4.2 and avgpool (pooled over H, W in the hook; d = 2048, n = 256, so the
entropy runs on the 256 x 256 Gram matrix); lam 0.01, beta 0.7; batch 256, 60 epochs, SGD 0.1,
milestones [25, 40, 52]. The whole uint8 training set (1.2 GB) lives on the GPU.

Run it:
  Lightning L40S (bf16):  python exp11_resnet50_tinyimagenet.py
      The first run downloads tiny-imagenet-200.zip (md5-checked) to data/ and decodes it once to
      data/tinyimagenet_uint8_v1.pt; later runs load that cache in seconds.
  Kaggle 2x T4 (fp16):    python tools/bundle.py exp11_resnet50_tinyimagenet.py -o dist/exp11_resnet50_tinyimagenet.py,
      upload it, attach Tiny-ImageNet as a dataset (found under /kaggle/input automatically), run
      !torchrun --standalone --nproc_per_node 2 /kaggle/input/<your-upload>/exp11_resnet50_tinyimagenet.py
      Batch 256 needs about 13.7 GiB (an estimate, docs/memory.md), more than one T4's 14.7 GiB less
      headroom: torchrun trains the same run with 128 per GPU. On one T4 only --batch-size 128 fits,
      another setting (its own folder; SES sees batches of 128). A run on a card it does not fit says
      so, and what fits, before training starts.
  CPU smoke test:         python exp11_resnet50_tinyimagenet.py --smoke
Rerunning the same command resumes unfinished runs and skips finished ones.
"""
import sys

from harness.cli import run_experiment

SETUP = dict(dataset="tinyimagenet", model="resnet50", layers="layer4+avgpool",
             smoke=dict(batch_size=4, eval_batch_size=4, attack_batch_size=4, n_train=8, n_test=4))  # R50: slow on a CPU
GRID = {
    "baseline": dict(ses=False),
    "ses_k1": dict(ses=True, every=1),
}


def main(argv=None) -> int:
    return run_experiment(__file__, SETUP, GRID, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
