"""Exp 12 - SES combined with Mixup and CutMix on CIFAR-100 (ResNet-18, SES hooks `all`).

Paper question: is SES complementary to the standard mixing regularisers, or does it only
repeat what Mixup/CutMix already give? Each `X_ses` is compared with its twin `X` (overhead, report
Δ with paired seeds): mixup_ses vs mixup, cutmix_ses vs cutmix, ses vs baseline. Six configs: each of {no mixing, Mixup alpha 1, CutMix
alpha 1} with and without SES (every step unless --every; lam 0.01, beta 0.7). Mixing uses
torchvision.transforms.v2.MixUp / CutMix on the GPU batch with soft-target cross-entropy.

Run it:
  Kaggle T4, one file:  python tools/bundle.py exp12_mixup_cutmix_cifar100.py -o dist/exp12_mixup_cutmix_cifar100.py
                        upload it, turn on the GPU, then: !python /kaggle/input/<your-upload>/exp12_mixup_cutmix_cifar100.py
                        (fp16 + GradScaler chosen on sm_75; results in /kaggle/working/results)
  Lightning L40S/local: python exp12_mixup_cutmix_cifar100.py
  CPU smoke test:       python exp12_mixup_cutmix_cifar100.py --smoke
Rerunning the same command resumes unfinished runs and skips finished ones.
"""
import sys

from harness.cli import run_experiment

SETUP = dict(dataset="cifar100", model="resnet18", layers="all")
GRID = {
    "baseline": dict(ses=False, mix="none"),
    "ses": dict(ses=True, mix="none"),                                    # vs baseline
    "mixup": dict(ses=False, mix="mixup"),
    "mixup_ses": dict(ses=True, mix="mixup", baseline_config="mixup"),    # vs its twin, not the baseline
    "cutmix": dict(ses=False, mix="cutmix"),
    "cutmix_ses": dict(ses=True, mix="cutmix", baseline_config="cutmix"),
}


def main(argv=None) -> int:
    return run_experiment(__file__, SETUP, GRID, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
