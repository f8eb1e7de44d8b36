"""The Postfix policy daemon: relay rights, POP-before-SMTP, rate limits, SPF, reputation.

It asks ``mailwarden.policy.PolicyResolver.effective_policy`` for each sender and recipient.
"""
