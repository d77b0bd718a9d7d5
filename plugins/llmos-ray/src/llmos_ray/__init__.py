"""llmos-ray: the ``ray`` executor — llmos's served models as Ray Serve
applications and its tuning jobs as Ray actors (see :mod:`llmos_ray.plugin`)."""
