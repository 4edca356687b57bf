"""jaxdfl: decentralized federated learning simulator in JAX."""
