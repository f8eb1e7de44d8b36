"""The content milter (pymilter): per-recipient virus, spam, keyword and attachment filters.

It asks ``mailwarden.policy.PolicyResolver.effective_policy`` for each recipient.
"""
