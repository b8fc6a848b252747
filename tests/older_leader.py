"""A real ``tlsroll-leader`` as one of a release before ``Leader.WithdrawWorkstationCertificate``
(session 43): the method is taken off its servicer, so gRPC answers it UNIMPLEMENTED, as such a
leader does: ``python tests/older_leader.py --config leader.toml``."""

from __future__ import annotations

import sys

from leader import service
from leader.daemon import main

if __name__ == "__main__":
    if hasattr(service.LeaderService, "WithdrawWorkstationCertificate"):
        del service.LeaderService.WithdrawWorkstationCertificate
    sys.exit(main(sys.argv[1:]))
