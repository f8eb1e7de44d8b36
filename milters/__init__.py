"""The content milter: per-recipient virus, spam, keyword and attachment filters.

Its own milter protocol server (:mod:`milters.server`) drives one async application per
MTA connection (:mod:`milters.app`); each recipient's services come from
``mailwarden.policy.PolicyResolver``.
"""
