"""Discriminators for adversarial methods (ADD's feature-network heads, LADD's heads on teacher features).

Empty until the adversarial methods land; methods that need no discriminator never import it.
"""
