"""Model-card templates shipped with xbt (installed as the package ``xbt.model_cards``)."""
