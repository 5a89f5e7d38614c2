"""Drop-in APIs of other TT-embedding libraries on ttdist's kernels (``ttdist.compat.fbtt``)."""
