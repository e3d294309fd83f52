"""Load, fault and bad-input tests of the notes example, and the audit they end with."""
