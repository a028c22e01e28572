"""Pure code shared by every role: no network, no Redis, no files beyond what a caller passes."""
