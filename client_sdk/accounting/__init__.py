"""Privacy accounting: exact binomial worst case, the paper's GDP view, dp-accounting composition."""

from client_sdk.accounting.report import DEFAULT_DELTA, PrivacyReport, privacy_report

__all__ = ["DEFAULT_DELTA", "PrivacyReport", "privacy_report"]
