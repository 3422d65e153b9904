"""HTTP service that serves trained MNIST VAEs: decode -> predict -> encode."""
