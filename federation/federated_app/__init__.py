"""The Flower app of the workbench federation: thin ServerApp and ClientApp."""
