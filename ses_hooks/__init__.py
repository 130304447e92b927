"""The activation collector of SES (ses_core.py): forward hooks that pool a layer's output to (n, d) for the penalty."""
