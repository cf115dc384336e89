"""One door per external system: storage (local and S3), launchers (torchrun, SLURM, MPI, Kubernetes), the
local S3 server of the demo and the tests, and data fetched through the package registry."""
