"""Experiments on real data: binarized MNIST (``data``), the VAE / k-sample ELBO / IWAE runs
and their evaluation (``mnist``), their report (``mnist_report``) and the paper's numbers they
are compared with (``paper``)."""
