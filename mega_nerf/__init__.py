"""A fast trainer for city-scale neural radiance fields, split into cells Mega-NeRF style."""
