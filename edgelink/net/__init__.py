"""Peers on a network: the libp2p node, identities, discovery, endpoints and the end-to-end crypto."""
