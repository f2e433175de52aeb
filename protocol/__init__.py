"""What the agent and the verifier share, and nothing else: report schemas, the signed envelope,
canonical encoding, fingerprints, identifiers. No I/O."""
