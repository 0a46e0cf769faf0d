"""Raw videos and photos → an Aff-Wild2-shaped tree of aligned 112×112 face crops (``affpipe crop``).

Example::

    from affpipe.video import CropConfig, crop
    summary = crop(CropConfig(inputs=(Path("clips/"),), out=Path("mytree")))
    # then: affpipe index mytree ... (see README "Your own videos")
"""

from affpipe.video.crop import CROP_OWNER, TABLE_SCHEMA, CropConfig, crop, format_summary
from affpipe.video.detect import TEMPLATE_112, FaceDetector, align_face, similarity_matrix
from affpipe.video.sources import Source, find_sources, video_name
from affpipe.video.track import build_tracks, track_names

__all__ = ["CROP_OWNER", "TABLE_SCHEMA", "TEMPLATE_112", "CropConfig", "FaceDetector", "Source", "align_face",
           "build_tracks", "crop", "find_sources", "format_summary", "similarity_matrix", "track_names",
           "video_name"]
