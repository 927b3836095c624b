"""The edge side of hierarchical inference (seed 004): an edge server doing remote inference over TCP
(`server`), its client (`client`), and a link emulator that shapes the TCP path between a board and
the server (`link`). `labbench edge-server` runs a server from the command line (`cli`)."""
