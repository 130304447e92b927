"""The exact eigen-solve under the SES penalty (ses_core.py): the routes and the auto choice, and the one-call batched cuSOLVER binding."""
