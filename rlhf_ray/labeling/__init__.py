"""Human feedback in the browser: clip rendering, the labeling app (Ray Serve + FastAPI)."""
