"""The browser viewer: a viser server that streams renders of a container (or of the field being trained) from
each browser's camera, beside the training cameras and the exported point cloud.

camera.py  what one browser asks to see (View), viser's cameras to ours and back
scene.py   what is rendered and how a frame becomes a picture (rgb, depth, cell overlays)
loop.py    one browser's render thread: low resolution while the camera moves, full resolution at rest
server.py  the viser server: clients, controls, cameras and points, recorded camera paths
app.py     `mega-nerf-view`: a container, its dataset and point cloud, served
watch.py   `train.py --viewer`: the field being trained, copied between steps and rendered at a bounded cost
"""
