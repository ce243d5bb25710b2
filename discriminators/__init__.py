"""Discriminators for the adversarial methods: GAN losses, and LADD's heads on the teacher's own features."""
