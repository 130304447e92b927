"""Exp 10 - Periodic SES on CIFAR-100 (ResNet-18 with the CIFAR stem, SES hooks `all`).

Paper question: how much of SES's accuracy/robustness gain survives when the penalty is applied
only on every k-th step, and how much training time does that save? Each SES config adds
lam * sum_l (H_l - beta log d_l)^2 on steps with step % k == 0 (lam 0.01, beta 0.7); other steps
are plain cross-entropy. Reported: acc, rob, and overhead = median epoch time / baseline's - 1.
The paper's T4 figures (acc / rob / overhead): baseline 74.99 / 46.32; k=1 76.11 / 47.70 / +195 %;
k=3 75.26 / 47.07 / +65 %; k=5 75.00 / 46.79 / +38 %; k=10 75.85 / 47.28 / +19 %.

Run it:
  Kaggle T4, one file:  python tools/bundle.py exp10_periodic_ses.py -o dist/exp10_periodic_ses.py
                        upload dist/exp10_periodic_ses.py, then in the notebook:
                        !python /kaggle/input/<your-upload>/exp10_periodic_ses.py   (fp16 + GradScaler on sm_75)
  Lightning L40S/local: python exp10_periodic_ses.py
  CPU smoke test:       python exp10_periodic_ses.py --smoke
Rerunning the same command resumes unfinished runs and skips finished ones.
"""
import sys

from harness.cli import run_experiment

SETUP = dict(dataset="cifar100", model="resnet18", layers="all")
GRID = {
    "baseline": dict(ses=False),
    "ses_k1": dict(ses=True, every=1),
    "ses_k3": dict(ses=True, every=3),
    "ses_k5": dict(ses=True, every=5),
    "ses_k10": dict(ses=True, every=10),
}


def main(argv=None) -> int:
    return run_experiment(__file__, SETUP, GRID, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
