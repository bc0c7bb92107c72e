"""Host-side data: the record format, the grain pipeline and on-device views."""
